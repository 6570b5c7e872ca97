"""scGPT in helixflow: model files in helical's cache layout and streaming tokenization."""
