"""RGB-T data: datasets in the MSRS / MFNet layouts, synthetic scenes, colour conversion, image I/O, palette."""
