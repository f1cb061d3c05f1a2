"""The run browser: a read-only web face of the runs under a prefix (`asyncsync serve`,
`watch --serve`). `catalog` reads and caches what the bucket says of each run, `pages`
renders it as HTML (every bucket-derived value escaped by construction, `markup`), `auth`
checks HTTP basic auth, and `app` wires the routes, the object streaming and the server."""
