"""Array kernels under the models: convolution (XLA's, with XLA:CPU rewrites), PyTorch-exact pooling
and unpooling, bilinear upsampling, input normalisation. No Flax modules here."""
