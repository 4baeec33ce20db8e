"""Hooks that count a function's calls and raise at one of them: a run killed at that point."""


class Interrupted(Exception):
    """What a hook raises: stands for the process being killed at that point."""


class Hook:
    """Counts the calls of function `name` of `module`; raises `Interrupted` at call `fail_at`."""

    def __init__(self, monkeypatch, module, name: str, fail_at: int | None = None):
        self.calls, self.fail_at = 0, fail_at
        real = getattr(module, name)

        def counted(*args, **kwargs):
            self.calls += 1
            if self.calls == self.fail_at:
                raise Interrupted(name)
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)

    def reset(self, fail_at: int | None = None) -> None:
        self.calls, self.fail_at = 0, fail_at
