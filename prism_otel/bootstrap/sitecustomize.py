"""prism-otel bootstrap, put on PYTHONPATH by ``prism-otel run``: starts prism-otel in every Python
process of the command (children inherit PYTHONPATH, so spawn-started ones too), then loads the
``sitecustomize`` this file shadows, if there is one, so the application's own keeps working."""


def _chain_shadowed_sitecustomize() -> None:
    import importlib.machinery
    import importlib.util
    import os
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    for entry in sys.path:
        if not entry or os.path.abspath(entry) == here:
            continue
        path = os.path.join(entry, "sitecustomize.py")
        if os.path.isfile(path):
            # the loader spec_from_file_location picks for a .py file, named so it is typed
            loader = importlib.machinery.SourceFileLoader("_prism_shadowed_sitecustomize", path)
            spec = importlib.util.spec_from_file_location("_prism_shadowed_sitecustomize", path, loader=loader)
            if spec is None:  # never with a loader given
                continue
            mod = importlib.util.module_from_spec(spec)
            sys.modules["_prism_shadowed_sitecustomize"] = mod
            loader.exec_module(mod)
            return


def _bootstrap() -> None:
    try:
        import prism_otel

        prism_otel.start(lazy=True)  # a companion only for processes that run engine steps
    except Exception as exc:  # noqa: BLE001 - never stop the application from starting
        import sys

        print(f"prism-otel: bootstrap failed: {exc!r}", file=sys.stderr)


_bootstrap()
_chain_shadowed_sitecustomize()
