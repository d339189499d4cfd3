"""Alerts: rules that watch the daemon's own figures decide when something needs a person, and
`deliver` posts each firing or resolved alert to a group robot (WeCom, DingTalk, Feishu) or to any
JSON receiver, from its own thread, so that a slow or broken webhook never slows the work it watches.
"""
