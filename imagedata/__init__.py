"""Images and the data sets beside ``dataset.py``: decoding and transforms, the image checks, the
prepared-image cache and its augmentation, FLICKR-AES, and the generated demo data sets.
They know no network (``models/``)."""
