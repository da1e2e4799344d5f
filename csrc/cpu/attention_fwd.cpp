// fastattn::fwd on the CPU: fused softmax attention, forward.
//
// Computes out = softmax(scale * q k^T + mask) v and lse = logsumexp(scale * q k^T + mask) per
// query row, for full, causal and sliding-window attention (any (left, right) window), GQA/MQA,
// key padding and Nq != Nk (bottom-right aligned), fp32 / fp64 / bf16 / fp16 inputs (fp32
// accumulation, fp64 for fp64), head dims 1..256, any strides with a contiguous last dim.
//
// Algorithm: OpenMP over (batch, query head, group of up to 4 blocks of 64 queries). Each group
// walks only the key blocks its window can reach (cost ~ N * window, not N^2), and each of its
// query blocks only those its own rows reach, with an online softmax in the exp2 domain. Per key
// block and query block: S^T = k q^T (micro-kernel; k read in place, q^T packed once per query
// block), the mask on straddling or padded blocks only, running max m and sum l per query as
// whole vectors, then acc = diag(alpha) acc + P v with the rescale fused into the product. The
// N x N score matrix is never stored; memory is O(N * D).
//
// bf16 inputs run on bf16 pair products (AMX tiles, or AVX512-BF16 vectors without AMX; see
// amx.h) when the CPU allows it (attention_forward_bf16_pairs below): the same blocks and the same
// fp32 softmax, with the two products as bf16 x bf16 -> fp32 multiplies.
//
// Not supported: dropout, attention bias other than the window and key padding, head dims > 256.
#include "cpu/attention_tiles.h"  // first: selects at::vec's ISA
#include "cpu/amx.h"

#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "attention_api.h"

namespace fastattn::cpu {
namespace {

template <typename scalar_t>
void attention_forward_kernel(const AttentionParams& p) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  constexpr int64_t L = Vec::size();
  constexpr int64_t BM = kBlockQueries;
  constexpr int64_t BN = kBlockKeys;
  static_assert(BM % L == 0, "query blocks must be whole vectors");
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  constexpr acc_t kLog2e = acc_t(1.4426950408889634);
  constexpr acc_t kLn2 = acc_t(0.69314718055994531);

  const int64_t D = p.head_dim;
  const int64_t Dv = p.head_dim_v;
  const int64_t Dv_pad = round_up(Dv, L);
  const Vec scale_log2(static_cast<acc_t>(p.scale) * kLog2e);
  const QueryGroups groups(p);

  const auto* q_base = static_cast<const scalar_t*>(p.q);
  const auto* k_base = static_cast<const scalar_t*>(p.k);
  const auto* v_base = static_cast<const scalar_t*>(p.v);
  auto* out_base = static_cast<scalar_t*>(p.out);
  auto* lse_base = static_cast<acc_t*>(p.lse);

  // The running state of each query block of a group (q^T, the output accumulator, m and l per
  // query); the key block's operands and the score tile are shared, one query block at a time.
  // Every group writes what it reads (its state, and the operands' padding: rows_operand), so
  // only the score tile starts zeroed. Zeroing all of it made short calls slower: B=1, H=8, N=16,
  // 1 thread, 34-41 us a call against 25-32 us without (longer calls: no difference).
  struct Workspace {
    UninitializedBuffer<acc_t> q_t, acc, row_max, row_sum, k, v, rescale;
    Buffer<acc_t> scores_t;
  };
  auto make_workspace = [&] {
    Workspace w;
    w.q_t.resize(kMaxGroupBlocks * D * BM);
    w.acc.resize(kMaxGroupBlocks * BM * Dv_pad);
    w.row_max.resize(kMaxGroupBlocks * BM);
    w.row_sum.resize(kMaxGroupBlocks * BM);
    w.k.resize(BN * D);
    w.v.resize(BN * Dv_pad);
    // Shared by a group's blocks: its columns past a block's rows hold finite values (scores of the
    // zero q^T columns, or an earlier block's tile), which the softmax reads and nothing uses.
    w.scores_t.resize(BN * BM);
    w.rescale.resize(BM);
    return w;
  };

  parallel_over_blocks(groups.count(), make_workspace, [&](int64_t item, Workspace& w) {
    const QueryGroup group = groups.group(p, item);
    const int64_t batch = group.blocks[0].batch, head = group.blocks[0].head, kv_head = group.blocks[0].kv_head;
    for (int64_t g = 0; g < group.size; ++g) {
      const QueryBlock& block = group.blocks[g];
      // Columns past the block's rows are zero: those queries score 0 (finite) and are never written.
      pack_rows_transposed(q_base + p.q_strides.offset(batch, head, block.row0), p.q_strides.row, block.rows, BM,
                           D, w.q_t.data() + g * D * BM, BM);
    }
    std::fill_n(w.row_max.begin(), group.size * BM, kNegInf);
    std::fill_n(w.row_sum.begin(), group.size * BM, acc_t(0));
    std::fill_n(w.acc.begin(), group.size * BM * Dv_pad, acc_t(0));

    for (int64_t key0 = group.key_begin; key0 < group.key_end; key0 += BN) {
      const int64_t keys = std::min(BN, group.key_end - key0);
      if (all_keys_padded(p, batch, key0, keys)) continue;
      int64_t k_ld, v_ld;
      const acc_t* k = rows_operand(k_base + p.k_strides.offset(batch, kv_head, key0), p.k_strides.row, keys, D,
                                    /*b_operand=*/false, w.k.data(), D, &k_ld);
      const acc_t* v = rows_operand(v_base + p.v_strides.offset(batch, kv_head, key0), p.v_strides.row, keys, Dv,
                                    /*b_operand=*/true, w.v.data(), Dv_pad, &v_ld);
      for (int64_t g = 0; g < group.size; ++g) {
        const QueryBlock& block = group.blocks[g];
        if (!block.reaches(key0, keys)) continue;
        const int64_t row_width = round_up(block.rows, L);  // query columns computed, whole vectors
        acc_t* s_t = w.scores_t.data();
        acc_t* acc = w.acc.data() + g * BM * Dv_pad;
        acc_t* row_max = w.row_max.data() + g * BM;
        acc_t* row_sum = w.row_sum.data() + g * BM;
        auto compute_scores = [&] {
          gemm<acc_t, Accumulate::kOverwrite>(keys, row_width, D, k, k_ld, 1, w.q_t.data() + g * D * BM, BM, s_t, BM);
          mask_scores(p, batch, key0, keys, block.row0, block.rows, BM, s_t);
        };
        compute_scores();
        const bool lagging = every_query_has_max(row_max);
        if (!lagging || !online_softmax_step_at_lagging_max(s_t, keys, scale_log2, row_max, row_sum, w.rescale.data())) {
          if (lagging) compute_scores();  // the rare tile whose max jumped: the attempt overwrote it
          online_softmax_step(s_t, keys, scale_log2, row_max, row_sum, w.rescale.data());
        }
        // acc = diag(rescale) acc + P v, with P[i][j] = S^T[j][i] read through strides.
        gemm<acc_t, Accumulate::kScaleRows>(block.rows, Dv_pad, keys, s_t, 1, BM, v, v_ld, acc, Dv_pad,
                                            w.rescale.data());
      }
    }

    // out = acc / l; rows that saw no key get out = 0 and lse = -inf (never NaN).
    for (int64_t g = 0; g < group.size; ++g) {
      const QueryBlock& block = group.blocks[g];
      for (int64_t i = 0; i < block.rows; ++i) {
        acc_t* acc_row = w.acc.data() + (g * BM + i) * Dv_pad;
        const acc_t sum = w.row_sum[g * BM + i];
        const acc_t inverse = sum > 0 ? acc_t(1) / sum : acc_t(0);
        for (int64_t d = 0; d < Dv_pad; d += L) (Vec::loadu(acc_row + d) * Vec(inverse)).store(acc_row + d);
        at::vec::convert(acc_row, out_base + p.out_strides.offset(batch, head, block.row0 + i), Dv);
        lse_base[block.batch_head(p) * p.seqlen_q + block.row0 + i] =
            sum > 0 ? (w.row_max[g * BM + i] + std::log2(sum)) * kLn2 : kNegInf;
      }
    }
  });
}

#if defined(FASTATTN_HAS_BF16_PAIRS)
// online_softmax_step for the bf16 pair path: P^T goes straight into its VNNI bf16 form (pairs of key
// rows interleaved, the B operand of out^T += v^T P^T) instead of back over the fp32 tile, rows
// [keys, padded_keys) zero. l sums the unrounded fp32 P, as the fp32 path does. Once every query
// has a max, the block is first tried at the lagging max without the max pass, as
// online_softmax_step_at_lagging_max does; the scores stay intact, so a rejected try just takes
// the full step.
inline void online_softmax_step_vnni(const float* scores_t, int64_t keys, int64_t padded_keys,
                                     Vectorized<float> scale_log2, float* row_max, float* row_sum, float* rescale,
                                     BFloat16* probs_vnni) {
  using Vec = Vectorized<float>;
  constexpr int64_t BM = kBlockQueries;
  constexpr int64_t L = Vec::size();
  constexpr int kVectors = BM / L;
  Vec shift[kVectors], sum[kVectors];
  auto exponentiate = [&] {
    for (int v = 0; v < kVectors; ++v) sum[v] = Vec(0.0f);
    for (int64_t pair = 0; 2 * pair < padded_keys; ++pair) {
      for (int v = 0; v < kVectors; ++v) {
        Vec prob[2];
        for (int half = 0; half < 2; ++half) {
          const int64_t j = 2 * pair + half;
          prob[half] = j < keys ? exp2_for_bf16(multiply_subtract(Vec::loadu(scores_t + j * BM + v * L), scale_log2, shift[v]))
                                : Vec(0.0f);
          sum[v] = sum[v] + prob[half];
        }
        _mm512_storeu_si512(probs_vnni + pair * 2 * BM + 2 * v * L, interleave_bf16(prob[0], prob[1]));
      }
    }
  };
  if (every_query_has_max(row_max)) {
    for (int v = 0; v < kVectors; ++v) shift[v] = Vec::loadu(row_max + v * L);
    exponentiate();
    if (accept_lagging_step(sum, row_sum, rescale)) return;
  }
  online_softmax_shift(scores_t, keys, scale_log2, row_max, rescale, shift);
  exponentiate();
  for (int v = 0; v < kVectors; ++v) {
    at::vec::fmadd(Vec::loadu(row_sum + v * L), Vec::loadu(rescale + v * L), sum[v]).store(row_sum + v * L);
  }
}

// The bf16 forward on pair products (AMX or AVX512-BF16, pair_gemm). As attention_forward_kernel,
// with the tiles' operands in bf16 for the pair products: S^T = k q^T (k rows as A, q^T packed
// once per query block as B) and out^T = v^T P^T (v^T as A, P^T packed after the fp32 softmax as
// B), out^T accumulated in fp32 and transposed into the output at the end of the block. k and v^T are first copied once per
// (batch, kv head) into zero-padded bf16 buffers, so tiles never read past the inputs and head dims
// need not be multiples of 32 (the padding contributes zeros).
void attention_forward_bf16_pairs(const AttentionParams& p) {
  constexpr int64_t BM = kBlockQueries;
  // Longer key blocks than the AVX-512 path: each tile multiply of out^T then runs over more keys
  // per load and store of its accumulator tiles, which dominate at short ones (measured on AMX:
  // per 64 keys, 1.96 us at 64-key blocks, 1.72 us at 256).
  constexpr int64_t BN = kPairBlockKeys;
  static_assert(BM % 32 == 0 && BN % 32 == 0, "pair-product blocks are multiples of 32");
  using Vec = Vectorized<float>;
  constexpr int64_t L = Vec::size();
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  constexpr float kLog2e = 1.4426950408889634f;
  constexpr float kLn2 = 0.69314718055994531f;
  const int64_t D = p.head_dim, Dv = p.head_dim_v;
  const int64_t D_pad = round_up(D, 32), Dv_pad = round_up(Dv, 32);
  // A key block may start at any key and always spans BN rows: room for BN past the end. Whole
  // cache lines per v^T row, so that its rows start on one.
  const int64_t key_rows = round_up(p.seqlen_k, 32) + BN;
  const Vec scale_log2(static_cast<float>(p.scale) * kLog2e);

  const auto* q_base = static_cast<const BFloat16*>(p.q);
  const auto* k_base = static_cast<const BFloat16*>(p.k);
  const auto* v_base = static_cast<const BFloat16*>(p.v);
  auto* out_base = static_cast<BFloat16*>(p.out);
  auto* lse_base = static_cast<float*>(p.lse);

  // The copies are made for a few kv heads at a time (kv_heads_per_pass says why).
  const int64_t kv_heads_total = p.batch * p.heads_kv;
  const int64_t heads_per_pass = kv_heads_per_pass(p, key_rows * (D_pad + Dv_pad) * int64_t(sizeof(BFloat16)));
  // Kept between calls (reusable_storage): each copy item below also zeroes the padding of its
  // keys, and the last one the key rows past seqlen_k, so every element a tile reads is written.
  UninitializedBuffer<BFloat16> k_rows_local, v_t_local;
  BFloat16* k_rows = reusable_storage<BFloat16, 2>(0, heads_per_pass * key_rows * D_pad, k_rows_local);
  BFloat16* v_t = reusable_storage<BFloat16, 2>(1, heads_per_pass * Dv_pad * key_rows, v_t_local);
  const int64_t key_chunks = ceil_div(p.seqlen_k, BN);
  const int64_t items_per_kv_head = p.kv_group() * ceil_div(p.seqlen_q, BM);
  auto no_workspace = [] { return 0; };
  struct Workspace {
    PairProductScope products;
    Buffer<BFloat16> q_vnni, probs_vnni;
    Buffer<float> scores_t, out_t, row_max, row_sum, rescale;
    Workspace(int64_t D_pad, int64_t Dv_pad)
        : q_vnni(D_pad * BM), probs_vnni(BN * BM), scores_t(BN * BM), out_t(Dv_pad * BM), row_max(BM),
          row_sum(BM), rescale(BM) {}
  };
  auto make_workspace = [&] { return Workspace(D_pad, Dv_pad); };

  for (int64_t first_head = 0; first_head < kv_heads_total; first_head += heads_per_pass) {
    const int64_t pass_heads = std::min(heads_per_pass, kv_heads_total - first_head);
    // Copies in chunks of keys, so that both threads work even with a single kv head.
    parallel_over_blocks(pass_heads * key_chunks, no_workspace, [&](int64_t item, int) {
      const int64_t slot = item / key_chunks, key0 = (item % key_chunks) * BN;
      const int64_t batch = (first_head + slot) / p.heads_kv, kv_head = (first_head + slot) % p.heads_kv;
      const int64_t keys = std::min(BN, p.seqlen_k - key0);
      // The last chunk also writes the padding key rows, up to key_rows.
      const int64_t copy_end = key0 + BN < p.seqlen_k ? key0 + keys : key_rows;
      BFloat16* k_slot = k_rows + slot * key_rows * D_pad;
      BFloat16* v_t_slot = v_t + slot * Dv_pad * key_rows;
      pack_rows(k_base + p.k_strides.offset(batch, kv_head, key0), p.k_strides.row, keys, D, k_slot + key0 * D_pad,
                D_pad);
      for (int64_t key = key0; key < copy_end; ++key) {
        std::fill(k_slot + key * D_pad + (key < p.seqlen_k ? D : 0), k_slot + (key + 1) * D_pad, BFloat16(0.0f));
      }
      transpose_rows(v_base + p.v_strides.offset(batch, kv_head, key0), p.v_strides.row, keys, Dv, v_t_slot + key0,
                     key_rows);
      for (int64_t d = 0; d < Dv_pad; ++d) {
        BFloat16* row = v_t_slot + d * key_rows;
        std::fill(row + (d < Dv ? key0 + keys : key0), row + copy_end, BFloat16(0.0f));
      }
    });

    // The query blocks of these kv heads (one contiguous range of items, see kv_heads_per_pass).
    parallel_over_blocks(pass_heads * items_per_kv_head, make_workspace, [&](int64_t pass_item, Workspace& w) {
      const QueryBlock block(p, first_head * items_per_kv_head + pass_item);
      const int64_t row0 = block.row0, rows = block.rows;
      const int64_t slot = block.batch * p.heads_kv + block.kv_head - first_head;
      const BFloat16* k_head = k_rows + slot * key_rows * D_pad;
      const BFloat16* v_t_head = v_t + slot * Dv_pad * key_rows;

      pack_transposed_vnni(q_base + p.q_strides.offset(block.batch, block.head, row0), p.q_strides.row, rows, BM, D,
                           D_pad, w.q_vnni.data(), 2 * BM);
      std::fill(w.row_max.begin(), w.row_max.end(), kNegInf);
      std::fill(w.row_sum.begin(), w.row_sum.end(), 0.0f);
      std::fill(w.out_t.begin(), w.out_t.end(), 0.0f);

      for (int64_t key0 = block.key_begin; key0 < block.key_end; key0 += BN) {
        const int64_t keys = std::min(BN, block.key_end - key0);
        if (all_keys_padded(p, block.batch, key0, keys)) continue;
        // The last block of a range is cut to whole 32-key tiles, not computed and masked in full.
        const int64_t tile_keys = round_up(keys, 32);
        float* s_t = w.scores_t.data();
        pair_gemm<false>(tile_keys, BM, D_pad, k_head + key0 * D_pad, D_pad, w.q_vnni.data(), 2 * BM, s_t, BM);
        mask_scores(p, block.batch, key0, keys, row0, rows, BM, s_t);
        online_softmax_step_vnni(s_t, keys, tile_keys, scale_log2, w.row_max.data(), w.row_sum.data(),
                                 w.rescale.data(), w.probs_vnni.data());
        // out^T = out^T * rescale (per query column) + v^T P^T; rows of P^T past `keys` are zero.
        // The multiply is skipped when no query's running max moved (rescale all exactly 1).
        if (!all_ones(w.rescale.data(), BM)) {
          for (int64_t d = 0; d < Dv_pad; ++d) {
            float* row = w.out_t.data() + d * BM;
            for (int64_t c = 0; c < BM; c += L) (Vec::loadu(row + c) * Vec::loadu(w.rescale.data() + c)).store(row + c);
          }
        }
        pair_gemm<true>(Dv_pad, BM, tile_keys, v_t_head + key0, key_rows, w.probs_vnni.data(), 2 * BM, w.out_t.data(),
                       BM);
      }

      // out = (out^T)^T / l; rows that saw no key get out = 0 and lse = -inf (never NaN).
      for (int64_t i = 0; i < rows; ++i) {
        const float sum = w.row_sum[i];
        w.rescale[i] = sum > 0 ? 1.0f / sum : 0.0f;
        lse_base[block.batch_head(p) * p.seqlen_q + row0 + i] = sum > 0 ? (w.row_max[i] + std::log2(sum)) * kLn2 : kNegInf;
      }
      store_transposed_scaled(w.out_t.data(), BM, rows, Dv, w.rescale.data(),
                              out_base + p.out_strides.offset(block.batch, block.head, row0), p.out_strides.row);
    });
  }
}
#endif  // FASTATTN_HAS_BF16_PAIRS

std::tuple<at::Tensor, at::Tensor> attention_forward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& key_padding_mask, double scale, int64_t window_left,
    int64_t window_right) {
  check_forward_inputs(q, k, v, key_padding_mask, scale, window_left, window_right);
  at::Tensor out = empty_in_layout_of(q, v.size(3));
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(lse_dtype(q.scalar_type())));
  const AttentionParams params =
      make_forward_params(q, k, v, key_padding_mask, out, lse, scale, window_left, window_right);
#if defined(FASTATTN_HAS_BF16_PAIRS)
  if (q.scalar_type() == at::kBFloat16 && bf16_pairs_available()) {
    attention_forward_bf16_pairs(params);
    return {out, lse};
  }
#endif
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "fastattn::fwd (CPU)",
                                  [&] { attention_forward_kernel<scalar_t>(params); });
  return {out, lse};
}

}  // namespace
}  // namespace fastattn::cpu

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("fwd", &fastattn::cpu::attention_forward_cpu);
}
