"""taskfleet operator tasks: `invoke --list` shows them all.

Each namespace lives in a small module under ops/; this file only assembles them.
"""

from invoke import Collection

from ops import bench_tasks, build_tasks, certs, chaos_tasks, cluster, dashboard_tasks
from ops import deploy as deploy_tasks
from ops import fleet, key, lint_tasks, release_tasks, reset, test_tasks, worker

ns = Collection()
ns.add_task(bench_tasks.bench)
ns.add_task(build_tasks.build)
ns.add_task(chaos_tasks.chaos)
ns.add_task(dashboard_tasks.dashboard)
ns.add_task(deploy_tasks.deploy)
ns.add_task(lint_tasks.lint)
ns.add_task(release_tasks.upgrade)
ns.add_task(release_tasks.rollback)
ns.add_task(test_tasks.test)
ns.add_task(reset.reset)
ns.add_collection(certs.ns)
ns.add_collection(cluster.ns)
ns.add_collection(key.ns)
ns.add_collection(worker.ns)
for fleet_task in (fleet.status, fleet.submit, fleet.demo, fleet.logs):
    ns.add_task(fleet_task)
