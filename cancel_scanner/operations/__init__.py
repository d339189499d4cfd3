"""What the operator's tools do, below their commands: reissue a refund WeChat closed, send an
ABNORMAL refund to a bank card, reconcile against WeChat's daily bill, prune finished rows.
Each takes an engine (and a gateway where it calls WeChat), never click."""
