"""Feature statistics, labels, search and steering."""
