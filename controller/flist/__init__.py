"""Flists: pack, read, fetch and mount ThreeFold flists (rfs v2 ``.fl`` and v1 ``.flist``)."""
