"""A clean slate for a module's in-place trials (cormlm.trials) in one test."""


def fresh_trials(monkeypatch, module) -> None:
    """Nothing measured or forced yet for ``module``'s in-place trials (its ``_choices``,
    ``_trials`` and ``FORCE_ENV``), for this test alone."""
    monkeypatch.setattr(module, "_choices", {})
    monkeypatch.setattr(module, "_trials", {})
    monkeypatch.delenv(module.FORCE_ENV, raising=False)
