"""Project-wide pytest setup, loaded before any test or notebook runs."""


def pytest_configure(config):
    # On a machine where matplotlib has never run, its first import builds a font cache and
    # logs "Matplotlib is building the font cache" to stderr. Inside a notebook that message
    # would be an output nbval does not expect, so build the cache here, once, before any
    # notebook kernel starts.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.font_manager  # noqa: F401  (importing it builds the cache)
