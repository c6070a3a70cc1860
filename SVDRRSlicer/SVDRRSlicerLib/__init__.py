"""Qt-free helpers of the SVDRRSlicer module that must work before the engine's dependencies are installed."""
