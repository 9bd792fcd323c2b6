"""`scaletrain scaletest`: every layout of N simulated ranks against one rank."""
