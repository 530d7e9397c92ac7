"""The synthetic shapes world: images, their captions, and a scorer that checks a caption against the
shapes an image holds."""
