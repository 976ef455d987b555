"""Schedule: the embedded work engine that runs jobs of C work across ready nodes.

``jobs`` is the API over jobs (submit, run, resume, status, result); ``engine`` is the
asyncio scheduler (agents in, tasks out, results recorded once, output in order) over
``connections`` (the agents' connections, heartbeats and EXEC fan-out), and
``run`` what it holds while a job runs; ``service`` keeps one engine alive inside
``orch serve``; ``runner`` hands it queued jobs; ``workmodules`` cut inputs into tasks (the contract;
``builtin_modules`` range, lines, chunks; ``module_loader`` a module by name);
``sinks`` take ordered output; ``sizing`` adapts each node's task size; ``stored`` reads
a job's stored work back for a resume.  It reaches nodes only through their agents and
``deploy.agent_install``; it never provisions.
"""
