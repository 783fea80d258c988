"""Dynamic DNS: keep the box's name pointing at its current public IP.

``detect`` asks several sources in parallel and takes the majority; a provider reports what
DNS serves (the zone's primary, or the provider's API) and changes it only when it differs.
"""
