"""
turso-server: many Turso databases behind one endpoint.

Each namespace is served by its own ``tursodb --sync-server`` child; this
package supervises those children, routes ``/<namespace>/<rest>`` to them and
offers an admin API for the namespace lifecycle.
"""

__version__ = "0.1.0"
