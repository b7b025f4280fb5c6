"""Small shared helpers for the model layer."""


class AttrDict(dict):
    """A dict whose keys are also attributes (upstream's return type for `T3.forward`)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError as e:
            raise AttributeError(name) from e

    def __setattr__(self, name, value):
        self[name] = value
