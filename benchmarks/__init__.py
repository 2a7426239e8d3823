"""cmcaug's benchmarks (`cmcaug bench`, `python -m cmcaug.benchmarks.<name>`): each prints a table and writes JSON."""
if __name__ != "cmcaug.benchmarks":  # found as `benchmarks` through a checkout root on sys.path (cmcaug/_checkout.py)
    from cmcaug._checkout import give_back

    give_back(__name__, __file__)
