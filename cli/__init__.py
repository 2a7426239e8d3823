"""cmcaug's command line: a thin layer over the library (`cmcaug --help`)."""
