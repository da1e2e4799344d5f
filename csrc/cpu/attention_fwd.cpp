// fastattn::fwd on the CPU: fused softmax attention, forward.
//
// Computes out = softmax(scale * q k^T + mask) v and lse = logsumexp(scale * q k^T + mask) per
// query row, for full, causal and sliding-window attention (any (left, right) window), GQA/MQA,
// key padding and Nq != Nk (bottom-right aligned), fp32 / fp64 / bf16 / fp16 inputs (fp32
// accumulation, fp64 for fp64), head dims 1..256, any strides with a contiguous last dim.
//
// Algorithm: OpenMP over (batch, query head, block of 64 queries). Each block walks only the key
// blocks its window can reach (cost ~ N * window, not N^2) with an online softmax in the exp2
// domain. Per key block: S^T = k q^T (micro-kernel; k read in place, q^T packed once per query
// block), the mask on straddling or padded blocks only, running max m and sum l per query as
// whole vectors, then acc = diag(alpha) acc + P v with the rescale fused into the product. The
// N x N score matrix is never stored; memory is O(N * D).
//
// Not supported: dropout, attention bias other than the window and key padding, head dims > 256.
#include "cpu/attention_tiles.h"  // first: selects at::vec's ISA

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

  struct Workspace {
    std::vector<acc_t> q_t, k, v, scores_t, acc, row_max, row_sum, rescale;
  };
  auto make_workspace = [&] {
    Workspace w;
    w.q_t.resize(D * BM);
    w.k.resize(BN * D);
    w.v.assign(BN * Dv_pad, acc_t(0));  // padding columns stay zero
    w.scores_t.resize(BN * BM);
    w.acc.resize(BM * Dv_pad);
    w.row_max.resize(BM);
    w.row_sum.resize(BM);
    w.rescale.resize(BM);
    return w;
  };

  const auto* q_base = static_cast<const scalar_t*>(p.q);
  const auto* k_base = static_cast<const scalar_t*>(p.k);
  const auto* v_base = static_cast<const scalar_t*>(p.v);
  auto* out_base = static_cast<scalar_t*>(p.out);
  auto* lse_base = static_cast<acc_t*>(p.lse);

  parallel_over_blocks(QueryBlock::count(p), make_workspace, [&](int64_t item, Workspace& w) {
    const QueryBlock block(p, item);
    const int64_t batch = block.batch, head = block.head, kv_head = block.kv_head;
    const int64_t row0 = block.row0, rows = block.rows;
    const int64_t row_width = round_up(rows, L);  // query columns computed, whole vectors

    pack_rows_transposed(q_base + p.q_strides.offset(batch, head, row0), p.q_strides.row, rows, BM, D, w.q_t.data(), BM);
    std::fill(w.row_max.begin(), w.row_max.end(), kNegInf);
    std::fill(w.row_sum.begin(), w.row_sum.end(), acc_t(0));
    std::fill(w.acc.begin(), w.acc.end(), acc_t(0));

    for (int64_t key0 = block.key_begin; key0 < block.key_end; key0 += BN) {
      const int64_t keys = std::min(BN, block.key_end - key0);
      if (all_keys_padded(p, batch, key0, keys)) continue;
      int64_t k_ld, v_ld;
      const acc_t* k = rows_operand(k_base + p.k_strides.offset(batch, kv_head, key0), p.k_strides.row, keys, D,
                                    /*whole_vectors=*/false, w.k.data(), D, &k_ld);
      const acc_t* v = rows_operand(v_base + p.v_strides.offset(batch, kv_head, key0), p.v_strides.row, keys, Dv,
                                    /*whole_vectors=*/true, w.v.data(), Dv_pad, &v_ld);
      acc_t* s_t = w.scores_t.data();
      gemm<acc_t, Accumulate::kOverwrite>(keys, row_width, D, k, k_ld, 1, w.q_t.data(), BM, s_t, BM);
      mask_scores(p, batch, key0, keys, row0, rows, BM, s_t);

      // Online softmax in the exp2 domain, a vector of queries at a time:
      // m' = max(m, max_j S_j * scale * log2(e)), P_j = 2^(S_j * scale * log2(e) - m'),
      // l' = l * 2^(m - m') + sum_j P_j. A query with nothing visible yet keeps m = -inf and
      // uses shift 0, so its P is 2^-inf = 0 rather than NaN.
      for (int64_t c = 0; c < row_width; c += L) {
        Vec block_max(kNegInf);
        for (int64_t j = 0; j < keys; ++j) block_max = at::vec::maximum(block_max, Vec::loadu(s_t + j * BM + c));
        const Vec old_max = Vec::loadu(w.row_max.data() + c);
        const Vec new_max = at::vec::maximum(old_max, block_max * scale_log2);
        const Vec shift = Vec::blendv(new_max, Vec(acc_t(0)), new_max == Vec(kNegInf));
        Vec sum(acc_t(0));
        for (int64_t j = 0; j < keys; ++j) {
          const Vec prob = exp2(at::vec::fmsub(Vec::loadu(s_t + j * BM + c), scale_log2, shift));
          prob.store(s_t + j * BM + c);
          sum = sum + prob;
        }
        const Vec rescale = exp2(old_max - shift);
        rescale.store(w.rescale.data() + c);
        at::vec::fmadd(Vec::loadu(w.row_sum.data() + c), rescale, sum).store(w.row_sum.data() + c);
        new_max.store(w.row_max.data() + c);
      }
      // acc = diag(rescale) acc + P v, with P[i][j] = S^T[j][i] read through strides.
      gemm<acc_t, Accumulate::kScaleRows>(rows, Dv_pad, keys, s_t, 1, BM, v, v_ld, w.acc.data(), Dv_pad,
                                          w.rescale.data());
    }

    // out = acc / l; rows that saw no key get out = 0 and lse = -inf (never NaN).
    for (int64_t i = 0; i < rows; ++i) {
      acc_t* acc_row = w.acc.data() + i * Dv_pad;
      const acc_t sum = w.row_sum[i];
      const acc_t inverse = sum > 0 ? acc_t(1) / sum : acc_t(0);
      for (int64_t d = 0; d < Dv_pad; d += L) (Vec::loadu(acc_row + d) * Vec(inverse)).store(acc_row + d);
      at::vec::convert(acc_row, out_base + p.out_strides.offset(batch, head, row0 + i), Dv);
      lse_base[(batch * p.heads_q + head) * p.seqlen_q + row0 + i] =
          sum > 0 ? (w.row_max[i] + std::log2(sum)) * kLn2 : kNegInf;
    }
  });
}

std::tuple<at::Tensor, at::Tensor> attention_forward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& key_padding_mask, double scale, int64_t window_left,
    int64_t window_right) {
  check_forward_inputs(q, k, v, key_padding_mask, scale, window_left, window_right);
  at::Tensor out = empty_in_layout_of(q, v.size(3));
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(lse_dtype(q.scalar_type())));
  const AttentionParams params =
      make_forward_params(q, k, v, key_padding_mask, out, lse, scale, window_left, window_right);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "fastattn::fwd (CPU)",
                                  [&] { attention_forward_kernel<scalar_t>(params); });
  return {out, lse};
}

}  // namespace
}  // namespace fastattn::cpu

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("fwd", &fastattn::cpu::attention_forward_cpu);
}
