// An independent PostgreSQL driver through tollgate: the JDBC driver from
// Debian's libpostgresql-jdbc-java, a prepared statement with a parameter.
// usage: java -cp /usr/share/java/postgresql.jar JdbcProbe.java HOST PORT TOKEN ID
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.util.Properties;

public class JdbcProbe {
    public static void main(String[] args) throws Exception {
        Properties props = new Properties();
        props.setProperty("user", "agent");
        props.setProperty("password", args[2]);
        props.setProperty("sslmode", "disable");
        props.setProperty("ApplicationName", "intent: jdbc probe");
        String url = "jdbc:postgresql://" + args[0] + ":" + args[1] + "/orders";
        try (Connection conn = DriverManager.getConnection(url, props);
             PreparedStatement stmt = conn.prepareStatement("SELECT name FROM customers WHERE id = ?")) {
            stmt.setInt(1, Integer.parseInt(args[3]));
            try (ResultSet rs = stmt.executeQuery()) {
                while (rs.next()) {
                    System.out.println(rs.getString(1));
                }
            }
        }
    }
}
