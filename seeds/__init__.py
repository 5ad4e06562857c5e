"""The seeds newsmon ships: the first feeds, topics and subscriptions, and the seed article.

Installed as ``newsmon.seeds``, so that ``newsmon run`` finds them from any directory; the
``NEWSMON_*_FILE`` settings name other files.
"""
