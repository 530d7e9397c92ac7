"""Captioning: the frozen open_clip encoder, the projectors, the CaptionModel that joins them to the
decoder, the Captioner that captions image files, and image decoding."""
