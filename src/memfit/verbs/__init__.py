"""The user's verbs: profile, plan, apply and remove, auto, verify, estimate, timing, benchmark
and the distributed agreement. They sit on the three lower layers (``measuring``, ``planning``,
``runtime``) and under the interfaces (the CLI, reports, integrations, built-in models); see
``docs/architecture.md``. Their public names are re-exported by :mod:`memfit`."""
