"""What a person reads: the HTML report and the example-image grids."""
