"""
twistd plugin: C{twistd -n turso-server [options]}.

Kept small because twistd imports every plugin to list them; the daemon
itself is imported only when this one is run.
"""

from __future__ import annotations

from twisted.application.service import IService, IServiceMaker
from twisted.plugin import IPlugin
from twisted.python import usage
from zope.interface import implementer

from turso_twisted.config import SETTINGS


class Options(usage.Options):
    """
    One option per setting; an option beats its environment variable.
    """

    synopsis = "[options]"
    longdesc = ("Serve many Turso databases (namespaces) behind one endpoint. "
                "Every option can also be set by the environment variable named in its help.")
    optParameters = [
        [setting.option, None, None, f"{setting.doc} [env {setting.env}, default "
                                     f"{setting.default!r}]"]
        for setting in SETTINGS
    ]

    def postOptions(self) -> None:
        # JSON lines on stdout unless the operator picked another logger.
        if self.parent is not None and self.parent.get("logger") is None:
            self.parent["logger"] = "turso_twisted.logs.observer_factory"


@implementer(IServiceMaker, IPlugin)
class TursoServerMaker:
    tapname = "turso-server"
    description = "Multi-tenant supervisor around tursodb --sync-server"
    options = Options

    def makeService(self, options: Options) -> IService:
        from turso_twisted.service import make_service

        return make_service(options)


serviceMaker = TursoServerMaker()
