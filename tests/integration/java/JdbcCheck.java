// The official ClickHouse JDBC driver (com.clickhouse:clickhouse-jdbc, spark_jobs/bench-jars),
// with its default settings, against the local ClickHouse endpoint. Run by
// tests/integration/test_clickhouse_jdbc.py:
//
//     K2_CLICKHOUSE_PASSWORD=... java -cp 'spark_jobs/bench-jars/*' JdbcCheck.java URL USER
//
// 1. reads every row of jdbc_src (filled by the test) and checks each value against the
//    formulas below, which the test's SQL shares;
// 2. inserts BATCH rows into jdbc_dst with PreparedStatement.addBatch/executeBatch (the test
//    then checks them with clickhouse-connect);
// 3. checks that an error reaches the caller as ClickHouse's (code and exception name);
// 4. inserts a smaller batch with the driver's request compression on (`decompress`: the
//    body goes in ClickHouse's block framing), its one non-default setting here.
// Prints one line per step; any mismatch throws, and java exits non-zero.

import java.math.BigDecimal;
import java.math.BigInteger;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.sql.Types;
import java.time.Instant;
import java.util.Properties;

public class JdbcCheck {
    static final long BASE_MS = 1_700_000_000_123L;
    static final String[] VENUES = {"binance", "kraken", "bitstamp-\u20ac"};
    static final BigInteger MAX_UINT64 = BigInteger.ONE.shiftLeft(64).subtract(BigInteger.ONE);
    static final int BATCH = 1000, FRAMED_BATCH = 100;
    static final long BATCH_FIRST_ID = 1_000_000L, FRAMED_FIRST_ID = 2_000_000L;

    static Instant ts(long i) {
        return Instant.ofEpochMilli(BASE_MS + i * 1001);
    }

    // i * 10^12 + i * 10^-18, negative for odd i: 35 significant digits of Decimal(38, 18)
    static BigDecimal amount(long i) {
        BigDecimal value = BigDecimal.valueOf(i).scaleByPowerOfTen(12)
                .add(BigDecimal.valueOf(i).scaleByPowerOfTen(-18)).setScale(18);
        return i % 2 == 0 ? value : value.negate();
    }

    static String venue(long i) {
        return VENUES[(int) (i % 3)];
    }

    static Long qty(long i) {
        return i % 7 == 0 ? null : -3 * i;
    }

    static void check(boolean ok, String what) {
        if (!ok) {
            throw new AssertionError(what);
        }
    }

    public static void main(String[] args) throws Exception {
        String url = args[0];
        Properties props = new Properties();  // the driver's defaults: nothing but credentials
        props.setProperty("user", args[1]);
        props.setProperty("password", System.getenv("K2_CLICKHOUSE_PASSWORD"));
        int expectedRows = Integer.parseInt(args[2]);
        try (Connection conn = DriverManager.getConnection(url, props)) {
            read(conn, expectedRows);
            insertBatch(conn, BATCH_FIRST_ID, BATCH);
            error(conn);
        }
        props.setProperty("decompress", "true");
        try (Connection conn = DriverManager.getConnection(url, props)) {
            insertBatch(conn, FRAMED_FIRST_ID, FRAMED_BATCH);
        }
    }

    static void read(Connection conn, int expectedRows) throws SQLException {
        long rows = 0;
        try (Statement st = conn.createStatement();
             ResultSet rs = st.executeQuery(
                     "SELECT id, big, ts, amount, venue, qty FROM jdbc_src ORDER BY id")) {
            while (rs.next()) {
                long i = rs.getLong("id");
                check(i == rows, "id " + i + " at row " + rows);
                BigInteger big = new BigInteger(rs.getString("big"));
                check(big.equals(MAX_UINT64.subtract(BigInteger.valueOf(i))), "big " + big + " of " + i);
                Instant ts = rs.getObject("ts", Instant.class);
                check(ts.equals(ts(i)), "ts " + ts + " of " + i);
                BigDecimal amount = rs.getBigDecimal("amount");
                check(amount.equals(amount(i)), "amount " + amount + " of " + i);
                String venue = rs.getString("venue");
                check(venue.equals(venue(i)), "venue " + venue + " of " + i);
                long qty = rs.getLong("qty");
                Long expected = qty(i);
                check(expected == null ? rs.wasNull() : (!rs.wasNull() && qty == expected),
                      "qty " + (rs.wasNull() ? "NULL" : qty) + " of " + i);
                rows++;
            }
        }
        check(rows == expectedRows, "read " + rows + " rows, expected " + expectedRows);
        System.out.println("read " + rows);
    }

    static void insertBatch(Connection conn, long firstId, int size) throws SQLException {
        String sql = "INSERT INTO jdbc_dst (id, big, ts, amount, venue, qty) VALUES (?, ?, ?, ?, ?, ?)";
        int[] counts;
        try (PreparedStatement ps = conn.prepareStatement(sql)) {
            for (long j = 0; j < size; j++) {
                long i = firstId + j;
                ps.setLong(1, i);
                ps.setObject(2, MAX_UINT64.subtract(BigInteger.valueOf(j)));
                ps.setObject(3, ts(i));
                ps.setBigDecimal(4, amount(i));
                // quotes and backslashes go through the driver's VALUES literals
                ps.setString(5, j % 10 == 0 ? "it's a \\ back'slash" : venue(i));
                if (qty(i) == null) {
                    ps.setNull(6, Types.BIGINT);
                } else {
                    ps.setLong(6, qty(i));
                }
                ps.addBatch();
            }
            counts = ps.executeBatch();
        }
        check(counts.length == size, "executeBatch returned " + counts.length + " counts");
        try (Statement st = conn.createStatement();
             ResultSet rs = st.executeQuery("SELECT count() FROM jdbc_dst WHERE id >= " + firstId
                                            + " AND id < " + (firstId + size))) {
            check(rs.next() && rs.getLong(1) == size, "jdbc_dst holds the batch from " + firstId);
        }
        System.out.println("batch " + firstId + " " + size);
    }

    static void error(Connection conn) throws SQLException {
        try (Statement st = conn.createStatement()) {
            st.executeQuery("SELECT * FROM no_such_table_anywhere");
            throw new AssertionError("a query of a missing table succeeded");
        } catch (SQLException e) {
            String text = String.valueOf(e.getMessage());
            check(text.contains("Code: 60") && text.contains("UNKNOWN_TABLE"), "error text: " + text);
        }
        System.out.println("error UNKNOWN_TABLE");
    }
}
