"""The operator's side of meshxl: what ``meshxl`` shows and changes in a running mesh.

* :mod:`~meshxl.operator.views`: ``status``, ``sync``, ``verify`` and the failovers,
  pure reports over one etcd read (and Envoy admin APIs);
* :mod:`~meshxl.operator.tables`: their tables (every cell plain text, never markup);
* :mod:`~meshxl.operator.actions`: the changes (model, member down/up, site
  offline/online), validated before anything is written;
* :mod:`~meshxl.operator.drill`: the DR drill, on the views and the actions.
"""
