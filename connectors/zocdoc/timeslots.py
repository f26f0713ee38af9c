"""Zocdoc's calendar timeslots: publishing a clinician's free slots per date and reading them back.

``PUT /v1/providers/{provider_id}/calendar/timeslots`` replaces the provider's whole set for a
date, every location at once; ``GET`` on the same path shows what Zocdoc offers now, which is
what syncbridge compares with what it wants shown (Zocdoc withdraws a booked slot by itself and
does not restore it on cancel). Self-scheduling rules place each slot: the office
(``location_id``) or the virtual location (``virtual_location_id``) by modality, the visit reasons
of the services that fit (``visit_reasons``), and ``patient_type`` new or existing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import date, datetime, timedelta
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import structlog

from syncbridge.connector import Slot
from syncbridge.errors import ConfigError, PermanentError
from syncbridge.model import Modality

from .mapping import timeslot_bodies

if TYPE_CHECKING:
    from .client import ZocdocClient

__all__ = ["TimeslotPublishing"]

log = structlog.get_logger("syncbridge.zocdoc")


class TimeslotPublishing:
    """The availability half of the Zocdoc connector (``publish``, ``published``)."""

    name: str
    options: Any
    practice: Any
    clinicians: dict[str, dict[str, Any]]

    def client(self) -> ZocdocClient:
        raise NotImplementedError

    def _check_self_scheduling(self) -> None:
        """Every service bookable online needs a visit reason of the same length, and telehealth hours
        a virtual location: refused at start, naming the key, rather than found at the first PUT."""
        o: ZocdocOptions = self.options
        reasons = {r.service_code: (pc, r.minutes) for pc, r in o.visit_reasons.items() if r.service_code}
        for key, account in self.clinicians.items():
            rules = self.practice.availability_of(key)
            for code, service in rules.online_services.items():
                if code not in reasons:
                    raise ConfigError(f"connectors.{self.name}.visit_reasons",
                                      f"service {code} is bookable online for {key} (availability.online_services) but no Zocdoc "
                                      f"visit reason maps to it: add pc_...: {{minutes: {service.minutes}, service_code: '{code}'}}")
                if reasons[code][1] != service.minutes:
                    raise ConfigError(f"connectors.{self.name}.visit_reasons.{reasons[code][0]}.minutes",
                                      f"{reasons[code][1]} minutes, but service {code} is offered to {key} for {service.minutes}")
            if rules.telehealth_hours and not account.get("virtual_location_id"):
                raise ConfigError(f"clinicians.{key}.accounts.{self.name}.virtual_location_id",
                                  "telehealth_hours are published to the provider's virtual location (lo_...): its id is required")

    def _slot_account(self, clinician: str) -> tuple[str, str, str]:
        """(provider id, location id, IANA zone) the clinician's slots are published with."""
        account = self.clinicians.get(clinician)
        if not account:
            raise PermanentError(f"clinician {clinician} has no account in connector {self.name}")
        location = account.get("location_id")
        if not isinstance(location, str) or not location:
            raise PermanentError(f"clinicians.{clinician}.accounts.{self.name}.location_id is needed to publish slots")
        return str(account["provider_id"]), location, str(account.get("time_zone") or self.practice.clinician_zone(clinician))

    def _placer(self, clinician: str, location: str) -> Callable[[Slot], dict[str, Any]]:
        """Where and for whom each slot is offered: the office or the virtual location, the visit
        reasons of its services (else the account's ``visit_reason_ids``), new or existing patients."""
        account = self.clinicians[clinician]
        virtual = account.get("virtual_location_id")
        reason_of = {r.service_code: pc for pc, r in self.options.visit_reasons.items() if r.service_code}
        default = account.get("visit_reason_ids")

        def place(slot: Slot) -> dict[str, Any]:
            if slot.modality == Modality.TELEHEALTH and not virtual:
                raise PermanentError(f"clinicians.{clinician}.accounts.{self.name}.virtual_location_id is needed for telehealth slots")
            out: dict[str, Any] = {"location_id": str(virtual) if slot.modality == Modality.TELEHEALTH else location}
            reasons = [reason_of[c] for c in slot.services if c in reason_of] if slot.services else default
            if isinstance(reasons, list) and reasons:
                out["allowed_visit_reason_ids"] = [str(r) for r in reasons]
            if slot.clients:
                out["patient_type"] = slot.clients
            return out

        return place

    async def publish(self, clinician: str, day: date, slots: Sequence[Slot]) -> None:
        """Replace the clinician's Zocdoc slots for ``day`` with exactly ``slots`` (one PUT, every location)."""
        provider, location, zone = self._slot_account(clinician)
        bodies, skipped = timeslot_bodies(slots, day, zone=zone, provider_id=provider, place=self._placer(clinician, location))
        if len(bodies) > 1500:
            raise PermanentError(f"{len(bodies)} slots on {day}: Zocdoc accepts at most 1,500 per provider and date")
        if skipped:
            log.warning("slots_not_expressible", connector=self.name, clinician=clinician, day=day.isoformat(), skipped=len(skipped),
                        why="repeated wall-clock hour at the end of daylight saving time")
        answer = await self.client().put_timeslots(provider, day, bodies)
        missing = (answer.get("errors") or {}).get("not_found_location_ids") or []
        if missing:
            raise PermanentError(f"Zocdoc does not know location {', '.join(map(str, missing))} "
                                 f"(clinicians.{clinician}.accounts.{self.name}.location_id or virtual_location_id)")
        log.info("slots_published", connector=self.name, clinician=clinician, day=day.isoformat(), slots=len(bodies))

    async def published(self, clinician: str, day: date) -> list[Slot]:
        """The slots Zocdoc offers for ``day`` now (``GET .../calendar/timeslots``): Zocdoc removes a
        booked slot by itself and does not put it back on cancel, so this is compared, not assumed.
        A wall time repeated by the autumn clock change reads as its first occurrence, as Zocdoc's does."""
        provider, _, zone = self._slot_account(clinician)
        virtual = self.clinicians[clinician].get("virtual_location_id")
        service_of = {pc: r.service_code for pc, r in self.options.visit_reasons.items() if r.service_code}
        minutes = self.options.session_minutes
        out: list[Slot] = []
        for item in await self.client().timeslots(provider, day):
            try:
                start = datetime.fromisoformat(str(item["start_time"])).replace(tzinfo=ZoneInfo(str(item.get("time_zone") or zone)))
            except (KeyError, ValueError, ZoneInfoNotFoundError):
                log.warning("timeslot_unreadable", connector=self.name, clinician=clinician, day=day.isoformat())
                continue
            modality = Modality.TELEHEALTH.value if virtual and item.get("location_id") == virtual else None
            services = tuple(sorted(service_of[r] for r in item.get("allowed_visit_reason_ids") or [] if r in service_of))
            clients = item.get("patient_type") if item.get("patient_type") in ("new", "existing") else None
            out.append(Slot(start, start + timedelta(minutes=minutes), modality, services, clients))
        return out
