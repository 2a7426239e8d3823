"""cmcaug's command line: a thin layer over the library (`cmcaug --help`)."""
if __name__ != "cmcaug.cli":  # found as `cli` through a checkout root on sys.path (see cmcaug/_checkout.py)
    from cmcaug._checkout import give_back

    give_back(__name__, __file__)
