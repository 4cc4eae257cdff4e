"""Our pretrained format and Hugging Face conversion."""
