"""What every layer of p3m-jax needs: file writes that never leave half a file, image files, the
compiler options and the compilation-cache switch, the error of a bad config value, and the shared
names (input normalisation, the files of a training workdir). Imports nothing else of the project."""
