"""The demo's sample plan: goods, orders and merchants' cancel requests, decided up front from the seed alone."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from cancel_scanner.demo.errors import DemoError
from cancel_scanner.demo.stages import expected_totals

MIN_ORDERS = (
    13  # one of each rejected kind, two CLOSED, one ABNORMAL, one lost payment, one partial, one unpaid, one paid
)
MAX_ORDERS = 500  # beyond this the demo would not settle in seconds on a small machine
DEFAULT_ORDERS = 40
REQUEST_WAVES = 4  # merchants' requests arrive in this many bursts (run.WAVE_GAP_SECONDS apart)

# What the shop sells: (name, price in fen, stock, sales before the demo's orders, which add to sales).
GOODS = (
    ("龙井茶 Longjing tea 250g", 12800, 120, 860),
    ("紫砂壶 Yixing teapot", 38800, 35, 210),
    ("青花瓷杯 Porcelain cup", 4500, 300, 1540),
    ("竹茶盘 Bamboo tea tray", 16800, 60, 385),
)
OPERATORS = ("clerk-li", "clerk-wang", "shop-admin")
REASONS = ("缺货 out of stock", "customer asked by phone", "地址错误 wrong address", "duplicate order")

# The order kinds the demo seeds, and what intake must answer for each.
# "unpaid": NOTPAY at WeChat (closed first, then cancelled); "lost_payment": the user paid, the
# shop's database never heard (found by close_unpaid, booked, then refunded).
# "partial": one unit of three out of stock: its share refunded, the order ships the other two.
ACCEPTED_KINDS = ("paid", "unpaid", "lost_payment", "closed", "abnormal", "partial")
PARTIAL_UNITS, PARTIAL_OF = 1, 3
REJECTED_KINDS = {
    "shipped": "ORDER_SHIPPED",
    "completed": "ORDER_SHIPPED",
    "deleted": "ORDER_DELETED",
    "zero_amount": "BAD_AMOUNT",
    "cancelled_before": "ALREADY_CANCELLED",
    "unsupported_op": "UNSUPPORTED_OP",
}
UNKNOWN_ORDER_CODE = "ORDER_NOT_FOUND"
DUPLICATE_CODE = "DUPLICATE_REQUEST"


@dataclass(frozen=True)
class Goods:
    id: int
    name: str
    price: int
    stock: int
    sales: int


@dataclass(frozen=True)
class Order:
    id: int
    kind: str  # one of ACCEPTED_KINDS or REJECTED_KINDS
    order_no: str
    goods_id: int
    quantity: int
    amount: int
    paid: bool

    @property
    def refunded(self) -> bool:
        """Money goes back, so stock comes back and sales go down."""
        return self.kind in ("paid", "abnormal", "lost_payment", "partial")

    @property
    def units_back(self) -> int:
        """The units that come back on the shelf and off the sales when it is settled."""
        return PARTIAL_UNITS if self.kind == "partial" else self.quantity

    @property
    def stock_back(self) -> bool:
        return self.refunded or self.kind == "unpaid"

    @property
    def counted_as_sold(self) -> bool:
        """In the shop's sales before the demo: a lost payment is not (it is booked, then refunded)."""
        return self.paid


@dataclass(frozen=True)
class Request:
    order_id: int
    op_type: str
    operator: str
    reason: str
    expect: str  # the result_code intake must write
    quantity: int | None = None  # units to cancel (a partial cancel); None: all of them


@dataclass
class Plan:
    seed: int
    goods: list[Goods]
    orders: list[Order]
    waves: list[list[Request]]

    @property
    def requests(self) -> list[Request]:
        return [r for wave in self.waves for r in wave]

    def orders_of(self, kind: str) -> list[Order]:
        return [o for o in self.orders if o.kind == kind]

    def expected_totals(self) -> dict[str, int]:
        """Rows each stage will finish, for the progress bars."""
        return expected_totals(self)

    def expected_goods(self) -> dict[int, tuple[int, int]]:
        """goods id -> (stock, sales) once everything settled."""
        after = {g.id: [g.stock, g.sales] for g in self.goods}
        for o in self.orders:
            if o.stock_back:
                after[o.goods_id][0] += o.units_back
            if o.refunded and o.counted_as_sold:
                after[o.goods_id][1] -= o.units_back  # a lost payment: booked (+) and taken back (-)
        return {gid: (s, q) for gid, (s, q) in after.items()}


def plan_demo(orders: int, seed: int) -> Plan:
    """Goods, ``orders`` orders and their cancel requests; the same seed gives the same plan."""
    if not MIN_ORDERS <= orders <= MAX_ORDERS:
        raise DemoError(f"--orders: must be between {MIN_ORDERS} and {MAX_ORDERS}, got {orders}")
    rng = random.Random(seed)
    catalogue = [Goods(i, name, price, stock, sales) for i, (name, price, stock, sales) in enumerate(GOODS, start=1)]
    special = list(REJECTED_KINDS) + ["closed", "closed", "abnormal", "lost_payment", "partial"]
    ordinary = orders - len(special)
    unpaid = max(1, round(ordinary * 0.25))
    kinds = special + ["unpaid"] * unpaid + ["paid"] * (ordinary - unpaid)
    rng.shuffle(kinds)

    planned: list[Order] = []
    for n, kind in enumerate(kinds):
        order_id = 1001 + n
        g = rng.choice(catalogue)
        qty = PARTIAL_OF if kind == "partial" else rng.choice((1, 1, 1, 2, 2, 3))
        paid = kind not in ("unpaid", "lost_payment", "cancelled_before")
        amount = 0 if kind == "zero_amount" else g.price * qty
        planned.append(Order(order_id, kind, f"SO{order_id:08d}", g.id, qty, amount, paid))

    requests: list[Request] = []
    for o in planned:
        op_type = "USER_CANCEL" if rng.random() < 0.2 else "MERCHANT_CANCEL"
        if o.kind == "unsupported_op":
            op_type = "PARTIAL_REFUND"
        requests.append(
            Request(
                o.id,
                op_type,
                rng.choice(OPERATORS),
                "缺货 out of stock: 1 unit" if o.kind == "partial" else rng.choice(REASONS),
                REJECTED_KINDS.get(o.kind, "OK"),
                PARTIAL_UNITS if o.kind == "partial" else None,
            )
        )
    unknown_id = 1001 + orders + 500
    requests.append(Request(unknown_id, "MERCHANT_CANCEL", "clerk-li", "typo in the order id", UNKNOWN_ORDER_CODE))
    rng.shuffle(requests)
    waves = [requests[i::REQUEST_WAVES] for i in range(REQUEST_WAVES)]
    # A second clerk cancels an order that is already on its way: it must not refund twice.
    twice = rng.choice([o for o in planned if o.kind == "paid"])
    waves[-1].append(Request(twice.id, "MERCHANT_CANCEL", "clerk-wang", "customer asked again", DUPLICATE_CODE))
    # Every paid order was a sale: the shop's figures already count it.
    sold: Counter[int] = Counter()
    for o in planned:
        if o.paid:
            sold[o.goods_id] += o.quantity
    goods = [Goods(g.id, g.name, g.price, g.stock, g.sales + sold[g.id]) for g in catalogue]
    return Plan(seed=seed, goods=goods, orders=planned, waves=waves)
