"""flist."""
