"""Prediction: inference, saliency (explain), heat maps, stored results, the trust pieces a
bundle ships."""
