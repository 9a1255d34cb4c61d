"""The Flower protocol both sides speak: message keys and codecs (wire), what a merchant keeps in Context.state
(merchant_state), privacy math, poisoned updates for robustness tests and Flower version checks. Imports
common.run and common.tasks. (Which tensors travel is the ML's business: common.tasks.exchange.)"""
