"""The processor components that ship with prism-otel, one module each: a config class, a
:class:`~processors.factory.ProcessorFactory` named ``factory`` and, for those that run in an engine's
pipeline or companion, how the environment configures them. Each is one line of pyproject.toml's
``[project.entry-points."prism_otel.processors"]`` (and of :data:`processors.registry.BUILTIN`)."""
