"""Foreign objects in: PyTorch models as batch functions, xarray DataArrays as arrays with dims (their libraries imported only when used)."""
