"""ConvertError: a checkpoint that cannot be converted, the one error every step of
`fusion-convert` raises (the command prints it as one line and exits 2)."""


class ConvertError(ValueError):
    """A checkpoint that cannot be converted, with a message naming the file, key or flag."""
