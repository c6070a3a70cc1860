"""Training of SVDRR's models (dataset rendering, training loops, evaluation). Imports ``SVDRRLogic``; the engine
never imports this package."""
