"""Array kernels with one API over NumPy and CuPy. Importable with NumPy alone."""
