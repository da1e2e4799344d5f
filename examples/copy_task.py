"""Copy task: a small transformer built from fastattn modules learns to copy random token sequences.

After "Copy this Sentence" (Lioutas & Drozdyuk, 2019, arXiv:1905.09856): each training example is

    BOS x_1 ... x_n SEP x_1 ... x_n          (x_i uniform random tokens)

and a causal language model is trained to predict the second half; accuracy is the fraction of
copied tokens predicted right (teacher forcing, argmax) on fresh random sequences. To copy x_i
the query at SEP + i - 1 must look n + 1 positions back. Two runs, identical but for attention:

* full causal attention reaches ~100% within a few hundred steps;
* a causal sliding window of `window` keys in each of `layers` layers can carry information at
  most window * layers positions back: when that is shorter than n + 1, x_i is out of reach
  and accuracy stays at chance (1 / vocab) -- the cost of a window that is too short.

The model is `fastattn.nn.TransformerEncoderLayer` (pre-norm, causal via ``is_causal=True``,
``window=(w, 0)`` for the windowed run) over learned token and position embeddings; everything
runs on the CPU through fastattn's fused kernels. Usage::

    python examples/copy_task.py                       # both runs, prints accuracies, writes the PNG
    python examples/copy_task.py --steps 300 --out /tmp/copy.png
"""

from __future__ import annotations

import argparse
import time
from typing import Dict, List, Optional

import torch

import fastattn


class CopyModel(torch.nn.Module):
    def __init__(self, vocab: int, length: int, dim: int, heads: int, layers: int, window: Optional[int]):
        super().__init__()
        self.token = torch.nn.Embedding(vocab, dim)
        self.position = torch.nn.Embedding(length, dim)
        self.layers = torch.nn.ModuleList(
            fastattn.nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.0, batch_first=True,
                                                norm_first=True, window=None if window is None else (window, 0))
            for _ in range(layers))
        self.norm = torch.nn.LayerNorm(dim)
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.token(tokens) + self.position.weight[: tokens.shape[1]]
        for layer in self.layers:
            x = layer(x, is_causal=True)
        return self.head(self.norm(x))


def make_batch(batch: int, length: int, symbols: int, generator: torch.Generator) -> torch.Tensor:
    """BOS x SEP x with x of `length` tokens in [0, symbols); BOS = symbols, SEP = symbols + 1."""
    x = torch.randint(0, symbols, (batch, length), generator=generator)
    bos = torch.full((batch, 1), symbols)
    sep = torch.full((batch, 1), symbols + 1)
    return torch.cat([bos, x, sep, x], dim=1)


def copy_loss_and_accuracy(model: CopyModel, tokens: torch.Tensor, length: int):
    logits = model(tokens[:, :-1])
    # Position SEP + i - 1 predicts x_i of the copy: the last `length` predictions.
    predicted, target = logits[:, -length:], tokens[:, -length:]
    loss = torch.nn.functional.cross_entropy(predicted.reshape(-1, predicted.shape[-1]), target.reshape(-1))
    accuracy = (predicted.argmax(-1) == target).float().mean()
    return loss, accuracy


def train(window: Optional[int], args) -> Dict[str, List[float]]:
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    symbols = args.vocab
    model = CopyModel(symbols + 2, 2 * args.length + 1, args.dim, args.heads, args.layers, window)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    history: Dict[str, List[float]] = {"step": [], "loss": [], "accuracy": []}
    name = "full" if window is None else f"window {window}"
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        loss, accuracy = copy_loss_and_accuracy(model, make_batch(args.batch, args.length, symbols, generator),
                                                args.length)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % args.log_every == 0 or step == args.steps:
            history["step"].append(step)
            history["loss"].append(loss.item())
            history["accuracy"].append(accuracy.item())
            print(f"[{name}] step {step:5d}  loss {loss.item():.4f}  token accuracy {accuracy.item():.3f}  "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    model.eval()
    eval_generator = torch.Generator().manual_seed(args.seed + 1)
    with torch.no_grad():
        _, final = copy_loss_and_accuracy(model, make_batch(1024, args.length, symbols, eval_generator), args.length)
    history["final_accuracy"] = [final.item()]
    history["seconds"] = [time.perf_counter() - start]
    return history


def plot(runs: Dict[str, Dict[str, List[float]]], args) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=90)
    for label, history in runs.items():
        ax_loss.plot(history["step"], history["loss"], label=label)
        ax_acc.plot(history["step"], history["accuracy"], label=f"{label}: {history['final_accuracy'][0]:.1%}")
    ax_loss.set(xlabel="step", ylabel="cross-entropy of the copy", yscale="log", title="training loss")
    ax_acc.axhline(1 / args.vocab, color="grey", linestyle=":", linewidth=1, label="chance")
    ax_acc.set(xlabel="step", ylabel="token accuracy", ylim=(0, 1.02),
               title=f"copying {args.length} tokens ({args.layers} layers)")
    ax_acc.legend(loc="center right", fontsize=8)
    ax_loss.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out)
    print(f"wrote {args.out}")


def main(argv=None) -> Dict[str, Dict[str, List[float]]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--length", type=int, default=32, help="tokens to copy (n)")
    parser.add_argument("--vocab", type=int, default=16, help="distinct tokens")
    parser.add_argument("--window", type=int, default=8, help="left window of the windowed run (keys back)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (the model is tiny: one thread avoids OpenMP synchronisation, which "
                             "dominates on a busy 2-core machine)")
    parser.add_argument("--out", default="examples/copy_task.png", help="PNG of the curves ('' = no plot)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    reach = args.window * args.layers
    print(f"copy {args.length} tokens: the copy looks {args.length + 1} positions back; a window of {args.window} "
          f"in {args.layers} layers reaches {reach} back")
    runs = {"full causal attention": train(None, args), f"causal window ({args.window}, 0)": train(args.window, args)}
    for label, history in runs.items():
        print(f"final token accuracy, {label}: {history['final_accuracy'][0]:.2%} "
              f"({history['seconds'][0]:.0f} s)")
    if args.out:
        plot(runs, args)
    return runs


if __name__ == "__main__":
    main()
