"""The web demo (`unires-serve`): a request batcher over `inference.Segmenter` (`batcher`) and the
Gradio page in front of it (`app`)."""
