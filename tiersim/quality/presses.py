"""kvpress presses as baselines of the quality grid (the optional extra ``tiersim[kvpress]``).

NVIDIA's kvpress is what users of KV compression already reach for (SnapKV, TOVA, Knorm,
ExpectedAttention, ObservedAttention, PyramidKV, KVzip, ...): a press is a context manager that hooks the
model's attention layers and prunes a ``DynamicCache`` in place, at the prefill (``NAME``) or also every
few decoding steps (``NAME@decode``: kvpress's ``PrefillDecodingPress`` of the press at the prefill and a
``CompressionRatioDecodingPress`` of it while decoding, every ``retier_every`` steps, like the hierarchy's
re-tiering). A press cell of the grid keeps the same share of the context as an eviction baseline at that
HBM ratio, and decodes the way kvpress's own pipeline does: prefill under the press, then greedy steps with
logical position ids (the pruned cache no longer says how many tokens came before).

Tested against kvpress 0.5.5, which needs transformers >= 5.2, < 5.3 (``pip install 'tiersim[kvpress]'``
in a venv of its own; docs/quality.md). The module itself imports neither kvpress nor torch until used, so
CI, which has neither that transformers nor kvpress, tests it with a stand-in press module.
"""

from __future__ import annotations

from dataclasses import dataclass

from tiersim.errors import ConfigError, TiersimError

TESTED = "kvpress 0.5.5 with transformers >= 5.2, < 5.3"
INSTALL = "pip install 'tiersim[kvpress]' (" + TESTED + ": a venv of its own)"
PREFIX = "kvpress:"
DECODE = "decode"


@dataclass(frozen=True)
class PressSpec:
    """A press named on the command line: its kvpress class and whether it also prunes while decoding."""

    name: str  # the class name without its "Press" suffix, as kvpress's README names them
    decode: bool = False

    @property
    def method(self) -> str:
        """The grid row's method name: ``kvpress:SnapKV``, ``kvpress:SnapKV@decode``."""
        return PREFIX + self.name + ("@" + DECODE if self.decode else "")


def parse_press(text: str) -> PressSpec:
    """``SnapKV``, ``SnapKVPress`` or ``SnapKV@decode`` -> PressSpec (the class is looked up when used)."""
    name, _, mode = text.strip().partition("@")
    name = name.strip()
    if name.endswith("Press") and name != "Press":
        name = name[: -len("Press")]
    if not name.isidentifier() or mode.strip() not in ("", DECODE):
        raise ConfigError(f"--kvpress: expected NAME or NAME@decode (e.g. SnapKV, ExpectedAttention@decode), got {text!r}")
    return PressSpec(name, mode.strip() == DECODE)


def parse_presses(text: str | None) -> list[PressSpec]:
    """A comma list of presses (None: none). Given but naming no press ('', ',') is refused (a trailing comma is fine): it would
    silently run the whole grid without the comparison asked for."""
    if text is None:
        return []
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts:
        raise TiersimError(f"--kvpress: expected comma-separated press names (e.g. SnapKV,ExpectedAttention@decode), "
                           f"got {text!r}")
    return [parse_press(part) for part in parts]


def import_kvpress():
    """The kvpress module, or one line saying how to get it."""
    try:
        import kvpress
    except ImportError:
        raise TiersimError(f"--kvpress needs kvpress: {INSTALL}") from None
    return kvpress


def make_press(spec: PressSpec, evict: float, retier_every: int, module=None):
    """The kvpress press that prunes ``evict`` of the context (at the prefill; with ``decode`` also while
    decoding, every ``retier_every`` steps). ``module``: kvpress itself, or a stand-in in tests."""
    module = import_kvpress() if module is None else module
    cls = getattr(module, spec.name + "Press", None)
    if not isinstance(cls, type):
        known = sorted(n[: -len("Press")] for n in dir(module) if n.endswith("Press") and n != "BasePress")
        raise TiersimError(f"--kvpress: kvpress has no press {spec.name!r} (it has {', '.join(known)})")
    try:
        prefill = cls(compression_ratio=evict)
        if not spec.decode:
            return prefill
        decoding = module.CompressionRatioDecodingPress(base_press=cls(), target_compression_ratio=evict,
                                                        compression_interval=retier_every)
        return module.PrefillDecodingPress(prefilling_press=prefill, decoding_press=decoding)
    except (TypeError, AssertionError, ValueError) as exc:
        # Presses without a compression ratio (wrappers, fixed-budget presses) cannot sit in a ratio grid.
        raise TiersimError(f"--kvpress {spec.method[len(PREFIX):]}: cannot run it at a compression ratio "
                           f"({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else exc!r})"
                           ) from None


def decode(model, input_ids, max_new_tokens: int, press=None, spec: PressSpec | None = None, cache=None,
           eos_ids=(), forced=None):
    """Greedy decoding of one prompt [1, L], as kvpress's pipeline decodes: (new token ids, per-step logits).

    ``press`` (made by :func:`make_press` for ``spec``) prunes at the prefill, and while decoding too when
    ``spec.decode``. Steps pass logical position ids (a pruned cache no longer counts the tokens before).
    ``cache``: a DynamicCache by default; a TieredCache runs through the same loop (the KL compares like
    with like). With ``forced`` (token ids) every step reads those tokens instead of its own choice
    (teacher forcing) and runs for all of them; the logits are float32 rows [vocab], one per new token.
    """
    import contextlib

    import torch
    from transformers import DynamicCache

    from tiersim.compat import cache_kwargs

    cache = DynamicCache() if cache is None else cache
    length = input_ids.shape[1]
    steps = len(forced) if forced is not None else max_new_tokens
    tokens, logits = [], []

    def pressing(active: bool):
        return press(model) if press is not None and active else contextlib.nullcontext()

    with torch.inference_mode():
        with pressing(True):
            out = model(input_ids=input_ids, **cache_kwargs(model, cache))
        with pressing(spec is not None and spec.decode):
            for step in range(steps):
                row = out.logits[0, -1].float()
                logits.append(row)
                token = int(forced[step]) if forced is not None else int(row.argmax())
                tokens.append(token)
                if step == steps - 1 or (forced is None and token in eos_ids):
                    break
                position = torch.tensor([[length + step]], device=input_ids.device)
                out = model(input_ids=torch.tensor([[token]], device=input_ids.device), position_ids=position,
                            **cache_kwargs(model, cache))
    return tokens, logits
