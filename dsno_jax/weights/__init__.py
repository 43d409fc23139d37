"""Published weights made loadable without PyTorch: a safe .pth reader and the one .npz format."""
