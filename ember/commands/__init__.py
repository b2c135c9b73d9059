"""One module per CLI verb (`ember <verb>`); see ember/__main__.py for how they are found."""
