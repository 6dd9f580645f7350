""":class:`ProfileOptions`: the options of :func:`memfit.profile`, checked once, as one value.

``memfit.profile``, ``plan``, ``auto``, ``estimate`` and ``profile_shapes`` take them as keyword
arguments (their public signatures); each builds a :class:`ProfileOptions` at its top, so that a
malformed option is refused before anything runs, and hands that on instead of the keywords.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from memfit.measuring.loop import TrainingLoop
from memfit.runtime.compiled import compile_options
from memfit.verbs.menu import check_options

__all__ = ["Blocks", "ProfileOptions"]

Blocks = Sequence[str] | str | None


@dataclass(frozen=True, kw_only=True, slots=True)
class ProfileOptions:
    """How :func:`memfit.profile` measures a model (each field as its argument of that name).

    Attributes:
        loop: the training loop to measure (``loss_fn``, ``optimizer``, ``keep_output``,
            ``accumulate``).
        blocks: the blocks' fqns (or their container's); ``None`` finds them.
        repeats: timed steps per way of running the model; ``None``: the fast path, or 3 when
            ``thorough``.
        options: the menu beside keep and recompute: ``"auto"`` or a tuple of option names,
            checked (:func:`memfit.verbs.menu.check_options`).
        distributed: ``None``: across ranks when a process group of several is initialised;
            ``False``: this process alone.
        compile: the blocks' ``torch.compile`` arguments (``None``: eager blocks), as
            :func:`~memfit.runtime.compiled.compile_options` reads ``compile=``.
        exact: only options bit-identical to the unplanned model's.
        thorough: time every way in turns, ``repeats`` times, before metering.

    Raises:
        ValueError, TypeError: as :func:`memfit.profile` for the same arguments: ``repeats``
            below 1, a malformed ``options`` or ``compile``, options that cannot run with the
            compile settings or without ``exact=False``.
    """

    loop: TrainingLoop = field(default_factory=TrainingLoop)
    blocks: Blocks = None
    repeats: int | None = None
    options: Literal["auto"] | tuple[str, ...] = "auto"
    distributed: bool | None = None
    compile: Mapping[str, Any] | None = None
    exact: bool = True
    thorough: bool = False

    def __post_init__(self) -> None:
        if self.repeats is not None and self.repeats < 1:
            raise ValueError(
                f"repeats must be at least 1 (timed steps per way of running); got {self.repeats}"
            )
        compiling = compile_options(self.compile)
        object.__setattr__(self, "compile", compiling)
        object.__setattr__(self, "options", check_options(self.options, self.exact, compiling))

    @classmethod
    def of(cls, **arguments: Any) -> ProfileOptions:
        """The options of :func:`memfit.profile`'s keyword ``arguments`` (``loss_fn``,
        ``optimizer``, ``keep_output`` and ``accumulate`` make the loop).

        Raises:
            TypeError: a keyword :func:`memfit.profile` does not take (named, with the list).
        """
        loop_keys = {f.name for f in fields(TrainingLoop)}
        own_keys = {f.name for f in fields(cls)} - {"loop"}
        unknown = sorted(set(arguments) - loop_keys - own_keys)
        if unknown:
            raise TypeError(
                f"memfit.profile takes no option {unknown[0]!r}; its options are "
                f"{sorted(loop_keys | own_keys)}"
            )
        loop = TrainingLoop(**{k: v for k, v in arguments.items() if k in loop_keys})
        return cls(loop=loop, **{k: v for k, v in arguments.items() if k in own_keys})
