"""Data: the embedded demo task (`synthetic`), hub dataset loaders (`hub`), padded batches and a
resumable epoch iterator (`batching`). Import the submodule you need."""
