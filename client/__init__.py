"""Merchant side: the Flower ClientApp and the merchant launcher."""
