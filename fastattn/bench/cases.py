"""What is measured: attention cases (full, causal, windows), modes, and their FLOP count."""

from __future__ import annotations

import argparse
import dataclasses

from .. import masks

__all__ = ["Case", "MODES", "MODE_FLOP_FACTOR", "flops"]

#: ``fwd``: forward only; ``bwd``: the backward pass alone (its forward runs untimed first);
#: ``fwd_bwd``: forward then backward.
MODES = ("fwd", "bwd", "fwd_bwd")
#: FlashAttention-3's convention (DESIGN section 6): the backward costs 2.5 forwards.
MODE_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}


@dataclasses.dataclass(frozen=True)
class Case:
    """One attention pattern: a name and fastattn's ``(left, right)`` window, -1 = unbounded."""

    name: str
    window_left: int
    window_right: int

    @classmethod
    def parse(cls, text: str) -> "Case":
        """``full``, ``causal``, ``window:LEFT,RIGHT`` or ``window:W`` (= ``W,W``)."""
        if text == "full":
            return cls("full", -1, -1)
        if text == "causal":
            return cls("causal", -1, 0)
        if text.startswith("window:"):
            try:
                sides = [int(x) for x in text.split(":", 1)[1].split(",")]
                if len(sides) not in (1, 2):
                    raise ValueError("give one or two sides")
                left, right = masks.normalise_window(sides[0] if len(sides) == 1 else tuple(sides))
            except (ValueError, TypeError) as exc:
                raise argparse.ArgumentTypeError(f"bad window in {text!r}: {exc}") from None
            return cls(f"window({left},{right})", left, right)
        raise argparse.ArgumentTypeError(f"a case is full, causal, window:LEFT,RIGHT or window:W, got {text!r}")

    @property
    def window(self):
        return self.window_left, self.window_right

    @property
    def is_full(self) -> bool:
        return self.window_left < 0 and self.window_right < 0

    @property
    def is_causal(self) -> bool:
        """Exactly causal (unbounded left, right = 0), which SDPA expresses with ``is_causal``."""
        return self.window_left < 0 and self.window_right == 0


def flops(batch: int, heads_q: int, seqlen_q: int, seqlen_k: int, head_dim: int, head_dim_v: int, case: Case,
          mode: str) -> float:
    """DESIGN section 6: forward ``2 * B * Hq * sum_i visible_keys(i) * (D + Dv)`` over the keys each
    query may see; backward 2.5x forward; fwd_bwd 3.5x."""
    visible = masks.visible_key_count(seqlen_q, seqlen_k, case.window_left, case.window_right)
    return 2.0 * batch * heads_q * visible * (head_dim + head_dim_v) * MODE_FLOP_FACTOR[mode]
