"""Component scores: exact patching (:mod:`.exact`), first-order and integrated-gradient
screening (:mod:`.first_order`), and screen-then-verify (:mod:`.pipeline`)."""
